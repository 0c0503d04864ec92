"""Evaluation: extracted features (``features``), linear probes (``probe``) and BERT mask ensembles
(``ensemble``)."""
