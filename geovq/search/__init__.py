"""`geovq tune`: hyperparameter search with Ray Tune + Optuna, on validation only.

    space.py    geovq/tune_spaces/<dataset>.yaml -> a typed, validated `Space`; per method a `Study` (the define-by-run
                sampler Optuna calls) that turns sampled values into a `Candidate` (K, d, VAE, overrides, params)
    trial.py    one Tune trial on a worker: train (or reuse) its VAE / VQ-VAE reporting validation PSNR per epoch,
                fit the quantizer, report validation PSNR at the bit budget. The test split is withheld.
    driver.py   one Tune experiment per method (OptunaSearch + ASHA), resumed by Tune's experiment restore
    outputs.py  trials.csv, best.yaml, figures, parameter importances, TensorBoard HParams
"""
