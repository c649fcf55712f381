"""Stage 2, `atcache train-from-cache`: ultralytics' trainer with attention transfer (`trainer`) fed by target sources
(`targets`: in RAM, `streaming`, `replay`) through atcache's datasets and samplers; views and their rendering."""
