"""LEMA (Learning from Mistakes): the corrector, the correction data, the student's fine-tune and the ablation."""
