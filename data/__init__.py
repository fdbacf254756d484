"""Data layer: dataset readers (VOC, labelImg folders, COCO), augmentation, datasets and loaders.

Submodules are imported explicitly (`from data.voc import load_vocdevkit`); this package file stays
empty of imports so that light users (e.g. the synthetic generator CLI) do not pull in torch.
"""
