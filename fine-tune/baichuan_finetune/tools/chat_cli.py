"""The terminal chat of ``scripts/cli_demo.py``: multi-line input, streaming, Ctrl+C stops a reply."""

from __future__ import annotations

from transformers import GenerationConfig

from .generation import Reply, StopFlag, stream_reply

CLI_HELP = """Commands: 'clear' new conversation, 'stream' toggle streaming, 'exit' quit.
Multi-line input: end a line with '\\' to continue it, or type '\"\"\"' to start and end a pasted block.
Ctrl+C stops a reply being generated (and clears a half-typed input); Ctrl+D quits."""
USER_PROMPT = "\nUser: "
CONTINUATION_PROMPT = "... "
ASSISTANT_PREFIX = "\nBaichuan 2: "


def read_user_message(read_line=input) -> str:
    """One message from the terminal: ``\\`` at a line's end continues it; ``\"\"\"`` brackets a paste."""
    line = read_line(USER_PROMPT)
    if line.strip() == '"""':
        lines = []
        while (line := read_line(CONTINUATION_PROMPT)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(CONTINUATION_PROMPT)
    lines.append(line)
    return "\n".join(lines)


def new_conversation(system: str = "") -> list[dict]:
    """The messages a conversation starts with: the system prompt, if any (``--system``)."""
    return [{"role": "system", "content": system}] if system else []


def run_terminal_chat(model, tokenizer, generation_config: GenerationConfig, stream: bool = True,
                      read_line=input, write=None, system: str = "") -> None:
    """The interactive loop of ``scripts/cli_demo.py``; history is kept in the chat format.

    ``system`` is the system prompt of every conversation ('clear' keeps it): the system message of
    the chat format, whose ids are those training gives a record's ``system`` field.
    """
    write = write or (lambda text: print(text, end="", flush=True))
    messages = new_conversation(system)
    write(f"Baichuan 2 chat ({'streaming' if stream else 'not streaming'}). {CLI_HELP}\n")
    if system:
        write(f"System prompt: {system}\n")
    while True:
        try:
            text = read_user_message(read_line)
        except KeyboardInterrupt:
            write("\n")
            continue
        except EOFError:
            write("\n")
            return
        command = text.strip().lower()
        if command in ("exit", "quit"):
            return
        if command == "clear":
            messages = new_conversation(system)
            write("(history cleared)\n")
            continue
        if command == "stream":
            stream = not stream
            write(f"(streaming {'on' if stream else 'off'})\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        write(ASSISTANT_PREFIX)
        stop_flag = StopFlag()
        events = stream_reply(model, tokenizer, messages, generation_config, stop_flag=stop_flag)
        reply = Reply()
        try:
            for new_text, reply in events:
                if stream and new_text:
                    write(new_text)
        except KeyboardInterrupt:  # Ctrl+C while printing: same as inside generation
            stop_flag.set()
            events.close()
            reply.finish_reason = "interrupted"
        if not stream:
            write(reply.text)
        if reply.finish_reason == "interrupted":
            write(" [stopped]")
        write("\n")
        # What was shown is what the model said: an interrupted reply stays in the history.
        messages.append({"role": "assistant", "content": reply.text})
