"""Stage 2, `atcache train-from-cache`: ultralytics' trainer with attention transfer (`trainer`, its settings checks in
`checks`) fed by one dataset class (`datasets`: cached targets and/or seeded augmentation, its tracked pipelines in
`transforms`) reading one target-source interface (`targets.TargetSource`: in RAM, `streaming`, `replay`), in the
orders of `samplers`; views and their rendering (`views`, `render`)."""
