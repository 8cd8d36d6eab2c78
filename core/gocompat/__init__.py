"""Go compatibility: what berth must write, quote, parse and word exactly as containerd's
Go does (``%q``, *PathError texts, durations, encoding/json bytes). One module per
concern, imported directly (``berth.core.gocompat.json``...): nothing is loaded here.
"""
