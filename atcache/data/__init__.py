"""Datasets as atcache reads them: split listing and images (`splits`), Pascal VOC conversion (`voc`), and the
synthetic VOC-format demo data (`synthetic`)."""
