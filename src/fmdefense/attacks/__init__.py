"""Attacks: Foolbox adapters (FGSM, DeepFool-L∞, CW-L2) and stored adversarial sets.

`library` builds and runs one attack on a batch and judges its outputs by re-classification;
`runner` attacks a whole split in resumable chunks and saves/loads the adversarial set;
`commands` adds `fmdefense attack`; `adaptive` attacks the defended pipeline itself (issue 7).
"""
