"""The main job's pinned configuration, shared by the tests that read its run (conftest's `quick_run`)."""

# `geovq sweep digits --quick` with every option that shapes the numbers explicit, so that later changes of
# defaults do not move them.
QUICK = ["sweep", "digits", "--quick", "--vae", "plain", "--methods", "vqvae,kmeans,geodesic,wasserstein,gq",
         "--prior", "transformer", "--geodesic-paths", "graph", "--geodesic-max-landmarks", "5000"]
