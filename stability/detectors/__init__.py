"""Detectors: pure functions over recorded histories, easy to test on hand-made sequences.

- `collapse`: how collapsed the output is (scream scores, levels, collapsed epochs);
- `series`: spikes, grad-norm growth and explosion, the loss's fall and divergence;
- `verdict`: `diagnose`, every finding of a finished run and its primary verdict, by the rules
  of `loss_rules` (divergence) and `scream_rules` (the scream and what is not one);
- `run_warnings`: what a researcher should see even in a stable run.

The package's face imports nothing: import from the module that owns a name.

    from stability.detectors.collapse import scream_score
    from stability.detectors.series import detect_spikes, growth_per_epoch
    scream_score([7, 7, 7, 7, 3])            # dominant 0.8, longest run 0.8, ...
    detect_spikes([1, 1.1, 0.9, 1, 40], window=4, z=6, warmup=3)   # [4]
    growth_per_epoch([2.45, 6.66, 16.71])     # ~2.61
"""
