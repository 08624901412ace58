"""Input checks: every problem of a report table or a segmentation dataset, found before training.

``mosmos check PATH`` runs them and prints each problem with the file at fault; training runs the
same checks on the cases it uses and, with ``data.on_bad_case: skip``, leaves the bad ones out and
lists them in ``RUN/skipped.csv``.

What is checked, per volume (NIfTI read with nibabel, other formats with MONAI's ``LoadImage``):

- the file exists and its header reads; with ``deep`` (the default) the voxels read too, which
  catches truncated or corrupt gzip streams;
- it is 3D (a trailing axis of length 1 is accepted; a 4D series is not);
- voxel sizes are finite, positive and at most :data:`~mosmos.check.volumes.MAX_SPACING_MM`, and
  the affine is invertible;
- images: no NaN/inf voxels; a constant image and one whose values look normalised rather than in
  Hounsfield units are warnings;
- label maps: integer values, no negative ids, only ids the dataset declares; an empty label map is
  a warning;
- an image and its label map agree in shape and affine.

Per table: readable, UTF-8 (bad lines are named), the named columns exist, each row has an image
and a non-empty report, case ids are unique, identical reports on several rows (a warning: fine
for reconstructions of one scan), and every image exists and passes the volume checks. Per
dataset: the layout reads, images and label maps pair up, listed files exist, case ids are unique,
and every label maps to a vocabulary organ.

MONAI's ``DataStats``/``check_*`` utilities report on one loaded tensor and raise on the first
problem; a checker that names every file at fault, before any preprocessing, is written here.

Modules: :mod:`~mosmos.check.volumes` (one file, and an image with its label map),
:mod:`~mosmos.check.cases` (many cases, threaded and cached), :mod:`~mosmos.check.tables`,
:mod:`~mosmos.check.datasets`, :mod:`~mosmos.check.report` (what ``mosmos check`` prints and writes)
and :mod:`~mosmos.check.startup` (what a run does with the problems it finds).
"""
