"""
failnozzle: a daemon that turns floods of application error reports into one
digest email every few seconds.
"""
