"""sft_helpers: the tested helper package of the SFT course.

One module per course concept; import what a notebook has taught, e.g.
`from sft_helpers.models import load_model`. This file stays light on purpose: the Colab
install cell runs `sft_helpers/install.py` before torch or transformers can be imported.
"""

__version__ = "0.1.0"
