"""Partially labelled segmentation datasets: nnU-Net v2 raw folders, MSD folders and MONAI datalists.

Each dataset names its labels its own way. :func:`read_seg_dataset` lists a dataset's cases (without
reading any voxel) and maps its label names to the organ vocabulary: an explicit per-dataset
``label_map`` wins, otherwise the vocabulary's label spellings (``configs/organs.yaml``) decide. A label
that maps to nothing is an error unless the config ignores it.

Supported layouts::

    nnU-Net v2 raw     Dataset011_Name/dataset.json  {"labels": {"background": 0, "spleen": 1}, ...}
                       Dataset011_Name/imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz
                       optional imagesTs/ (+ labelsTs/)
    MSD                Task09_Spleen/dataset.json    {"labels": {"0": "background", "1": "spleen"},
                       "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                       "test": ["./imagesTs/y.nii.gz"], "modality": {"0": "CT"}}
    MONAI datalist     any.json with "training" (and optional "validation", "test"/"testing") lists
                       of {"image", "label"}; "labels" optional (else given by the config)

Modules: :mod:`~mosmos.segdata.dataset` (the dataset record and :func:`read_seg_dataset`),
:mod:`~mosmos.segdata.layouts` (layout detection, the case record), :mod:`~mosmos.segdata.nnunet`,
:mod:`~mosmos.segdata.datalist` (MSD and MONAI datalists) and :mod:`~mosmos.segdata.label_mapping`
(label names to vocabulary organs). Voxel checks of a dataset are :mod:`mosmos.check.datasets`'.
"""
