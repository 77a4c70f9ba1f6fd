"""Lesion tracking from a baseline to a follow-up CT: a consumer of the correspondence engine and the field.

A lesion is one positive integer label of a labelmap on the baseline grid (or one labelled point,
segmented at both time points by :mod:`.refine`). :mod:`.inputs` reads and checks the lesions,
:mod:`.carry` pulls the labelmap onto the follow-up grid through the field (label-preserving),
:mod:`.refine` fits each carried lesion to the follow-up image, :mod:`.measure` gives volumes,
RECIST-style axial diameters and mean HU, :mod:`.track` runs the whole job and :mod:`.outputs`
writes ``followup_lesions.nii.gz``, ``lesions.csv``, ``report.md`` and ``lesions.png``. Over several
follow-ups, :mod:`.series` follows each lesion through all of them (pairs of :mod:`.track`, chained
or direct), :mod:`.response` applies the RECIST 1.1 rules, :mod:`.growth` draws the growth curves and
:mod:`.series_outputs` writes the series' files. The knobs
(:class:`~MedDIFTLib.core.options.LesionOptions`, :class:`~MedDIFTLib.core.options.SeriesOptions`)
live in :mod:`MedDIFTLib.core.options`.
"""
