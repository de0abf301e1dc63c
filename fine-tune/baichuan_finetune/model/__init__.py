"""The Baichuan2 config, tokenizer (the chat format) and model. Self-contained: these files import only
each other, relatively, because saving copies them next to the weights (trust_remote_code)."""
