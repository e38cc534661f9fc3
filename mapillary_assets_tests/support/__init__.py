"""What the tests share, by kind:

- `world`: the test area files, the emulator's token, scale and seed (the reference world)
- `emulated_runs`: in-process pipeline runs against the emulator (resources, instance, definitions)
- `reference`: the fault-free reference run the reliability tests compare against
- `assertions`: comparisons of final data and pictures
- `measurements`: reliability figures and their output file
- `partition_process`: a pipeline job in a process of its own (`run_partition`, the script it runs)
- `dagster_server`: a real `dagster dev` / webserver deployment
- `staging_samples`: small hand-written stage files
"""
