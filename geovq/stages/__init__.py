"""The sweep's stages: plain functions over files in a run directory, each taking a `device`, no Ray.

    dataset ─ train_vae ─> model.pt ─ extract ─> latents_{train,val,test}.npz ─ score_vae ─> ceiling.json
                                                      │
    unit ─ fit (quantizer; geodesic: edges) ─> quantizer.npz ─ encode ─> codes_{train,val,test}.npy
                                                      ─ score ─> row.json ─ [finetune ─> row_finetuned.json]
    unit (end to end) ─ train_end_to_end ─> model.pt ─ encode ─> codes_{split}.npy ─ score ─> row.json
    unit ─ [prior ─> prior-{kind}/, its rate and samples into the rows] ─> finished.json
    rows ─ geovq.report ─> results.json/.csv, report.md, figures/

Modules: `units` (typed VaeSpec and Unit), `plan` (a run's units, planned once), `row` (the typed results
row), `rundir` (where every file lives), one module per stage (`train_vae`, `extract`, `fit`, `edges`, `encode`,
`score`, `finetune`, `end_to_end`, `prior`), and `run` (the composites a Ray Tune trial runs: `run_vae`,
`run_unit`). `geovq.distributed` wraps these and nothing else.
"""
