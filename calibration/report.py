"""`python -m calibration.report`: the old name of `validate quant-report` (a measurement, so it
lives among the validators now). Kept as an alias so documented commands keep working."""

import sys

if __name__ == "__main__":
    from validate.quant_report import main

    sys.exit(main(prog="python -m calibration.report"))
