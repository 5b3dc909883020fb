"""The speed benchmark behind `make bench`: each row is a ratio against a baseline measured in this process.

Machines like ours are shared and noisy, so a comparison runs its sides in alternating order (A B, B A,
...) and reports the median of the per-round ratios; absolute numbers are kept only as context.

- `suite`: the rows and what runs for each (`suite.run(mode)`); the sweep rows run `sweeps/default.yaml`
  (`sweeps/bench_quick.yaml` in quick mode) with its pruner and with none;
- `runs`: the timed runs (our trainer, bare Keras `fit`, test accuracy against time);
- `overhead`: where a sweep trial's time goes outside its training steps;
- `stats`: alternating sides and per-round ratios;
- `replay`: an unpruned study's trials replayed through candidate pruners, to choose one;
- `machine`: the CPU (`tfsweep.cpu`), its float32 peak and a matmul yardstick;
- `report`: the table, the plot and the saved JSON.
"""
