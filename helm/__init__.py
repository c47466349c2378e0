"""The collector's Helm chart, shipped inside the package as data.

An installed commlens carries it, so an operator needs no checkout:
``helm install commlens "$(python -c 'from commlens.helm import CHART; print(CHART)')"``.
"""

import pathlib

CHART = pathlib.Path(__file__).parent / "commlens"
