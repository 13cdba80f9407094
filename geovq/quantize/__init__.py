"""Post-hoc quantizers, one module per method, chosen by name from one registry.

    from geovq.quantize import make_quantizer
    q = make_quantizer("kmeans", n_codes=256).fit(train_latents)
    codes = q.encode(test_latents); mu_hat = q.decode(codes)
"""

import importlib
import pkgutil

from geovq.quantize.base import QUANTIZERS, Quantizer, get_quantizer_class, make_quantizer, register

# Import every module of this package so that each method registers itself: adding a method is one file.
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["QUANTIZERS", "Quantizer", "get_quantizer_class", "make_quantizer", "register"]
