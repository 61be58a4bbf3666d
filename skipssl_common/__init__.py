"""What training, evaluation and launch all need, kept light: rank and rendezvous set-up, atomic file I/O.

A package of its own beside ``skipssl``, not inside it: importing ``skipssl`` registers the SkipAt models with
timm (seconds of imports), and a launch job must install its signal handlers within milliseconds of starting.
Nothing here imports torch, timm or deepspeed at module level, nor anything from ``skipssl``.
"""
