"""Layer 2: observers, streaming range estimators for calibration.

Every observer is built as ``Observer(fmt, granularity, symmetric=True, scale_dtype="fp32",
**options)``, is fed batches with ``update(x)`` and returns ``QParams`` from ``compute()``
(via ``lowbit.formats.qparams_from_range``). ``get_observer(name, ...)`` builds one by
name: ``minmax``, ``absmax``, ``ema``, ``percentile``, ``meanstd``, ``mse``, ``kl``.
See ``base`` for what each granularity means for streaming data (``token`` pools to one
per-tensor range; use ``channel`` with ``axis=-1`` for one range per hidden channel).
"""

from lowbit.observers.base import (
    Observer,
    ObserverError,
    get_observer,
    list_observers,
    register_observer,
)
from lowbit.observers.entropy import HistogramKLObserver
from lowbit.observers.histogram import StreamingHistogram
from lowbit.observers.minmax import AbsMaxObserver, MinMaxObserver, MovingAverageMinMaxObserver
from lowbit.observers.search import MSEObserver
from lowbit.observers.statistics import MeanStdObserver, PercentileObserver
from lowbit.observers.weight_clip import WEIGHT_CLIP_RATIOS, mse_clipped

__all__ = [
    "WEIGHT_CLIP_RATIOS",
    "mse_clipped",
    "AbsMaxObserver",
    "HistogramKLObserver",
    "MSEObserver",
    "MeanStdObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "ObserverError",
    "PercentileObserver",
    "StreamingHistogram",
    "get_observer",
    "list_observers",
    "register_observer",
]
