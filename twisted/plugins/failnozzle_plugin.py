"""
The twistd plugin: ``twistd failnozzle``.  Nothing else belongs here, because
twistd imports every module in this package when it looks for plugins.
"""
from twisted.application.service import ServiceMaker

failnozzle = ServiceMaker(
    "failnozzle",
    "failnozzle.tap",
    "Fold floods of error reports into one digest email every few seconds.",
    "failnozzle",
)
