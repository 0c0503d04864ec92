"""Records in, tokens out: dataset readers (``sources``), image decoding (``images``), the paper's transforms
(``transforms``), the k-means palette (``palette``) and the Ray Data stages with their error reports (``ingest``)."""
