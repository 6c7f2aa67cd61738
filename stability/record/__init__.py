"""The run record: what a run writes and how it is read back, in one package.

- `format`: the run folder's file names, keys, record types with units, the grad table;
- `verdicts`: the verdict vocabulary and its severity order;
- `writer`: `RunWriter`, the one object that writes a run folder as the run goes;
- `summarizer`: `Summarizer`, the detectors fed as the run goes, and the summary.

The package's face imports nothing: the CLI reads `format` at start-up without numpy or pandas.
"""
