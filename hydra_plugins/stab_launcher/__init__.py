"""stab's SLURM launcher where Hydra looks for launcher plugins: Hydra instantiates a launcher
only from a class defined in the `hydra_plugins` namespace package. The code is in
`stability.slurm`; conf/hydra/launcher/stab_slurm.yaml names this class."""

from stability import slurm


class StabSlurmLauncher(slurm.StabSlurmLauncher):
    """`stability.slurm.StabSlurmLauncher`, registered with Hydra under this module's name."""
