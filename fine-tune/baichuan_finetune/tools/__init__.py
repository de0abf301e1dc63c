"""Loading any output directory and the tools built on it: chat, server, evaluation, merge, convert."""
