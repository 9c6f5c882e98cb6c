"""Calibration drivers: they run models over data and hand the results to the library (`cometjax`
never imports this package).

- `stats`: activation statistics of every quantized LLM layer (`collect_stats`, `calibration_windows`)
- `pipeline`: `calibrate_and_quantize(model, config, windows)`
- `adaround`: the diffusion calibration set, activation ranges, layer-wise AdaRound (`run_ptq`)
- `quest`: QuEST's selective finetuning (TLA + CMA) and the per-setting recipes
"""
