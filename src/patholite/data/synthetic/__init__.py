"""The synthetic data generators: H&E-like tissue tiles of the four BACH classes (``tiles``) and whole
slides built from them (``spec``, ``scene``, ``slides``), so everything runs offline with no download."""
