"""
failnozzle: a daemon that turns floods of application error reports into one
digest email every few seconds.
"""

#: failnozzle's version; setup.cfg reads it from here.
__version__ = "2.0.0.dev0"
