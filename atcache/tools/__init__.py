"""What users run on a cache (`fidelity`, `visualize`) and the experiment harness (`demo`, `bench`, `measure`, `study`)."""
