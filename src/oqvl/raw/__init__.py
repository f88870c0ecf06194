"""Stage 1, raw: pair lists -> img2dataset -> webdataset shards, with every pair accounted for."""
