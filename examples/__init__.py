"""Examples of your own model under stab (docs/your-model.md): `gpt` (a small GPT on a text file),
`vit` (a ViT-style patch transformer on synthetic images) and `own_loop.py` (stab's monitor in a
plain PyTorch loop). Importable from the repository root: model._target_=examples.gpt.build."""
