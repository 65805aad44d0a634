"""Attacks: Foolbox adapters (FGSM, DeepFool-L∞, CW-L2), stored adversarial sets, adaptive attacks.

`library` builds and runs one attack on a batch and judges its outputs by re-classification;
`runner` attacks a whole split in resumable chunks and saves/loads the adversarial set; `jobs`
is the `attack` command's job; `defended` judges any `Defense` by its hard decisions;
`adaptive` attacks the defended pipeline itself (issue 7).
"""
