"""peft-clm: controllable-alignment layers (CLM) as a PEFT method.

Importing the package registers the method with PEFT:

```py
>>> import peft_clm
>>> from peft import get_peft_model
>>> model = get_peft_model(base_model, peft_clm.ClmConfig())
>>> model.set_alpha(0.5)
```
"""

from .registry import register_clm


register_clm()

from .config import ClmConfig  # noqa: E402
from .layer import ClmLayer  # noqa: E402
from .model import ClmModel  # noqa: E402


__all__ = ["ClmConfig", "ClmLayer", "ClmModel"]
__version__ = "0.1.0"
