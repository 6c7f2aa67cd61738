"""stab's library: configs, workloads, the instrumented step, the run record, detectors and reports."""
