"""Applications of the engine ("worlds"): each builds a model, data and user embeddings from a
config and runs. Importing this package registers the built-in ones with `ppd_engine.world`:

    toy       the embedded toy world (ppd_engine/worlds/toy): `python -m ppd_engine.train`
    pickapic  Pick-a-Pic v2 pairs on a diffusers base (ppd_engine/worlds/pickapic)

The core (ops, losses, adapters, training, data, ...) never imports this package.
"""

from ppd_engine.worlds.pickapic import world as _pickapic  # noqa: F401  (registers "pickapic")
from ppd_engine.worlds.toy import world as _toy  # noqa: F401  (registers "toy")
