"""Real chat templates, as test fixtures (`tests/data/test_chat.py`), each with a `{% generation %}` variant.

Every template here renders exactly what the model's own tokenizer renders; the `*_MARKED` variant renders the
same text (checked by the tests) and wraps each assistant turn's content and its end-of-turn token in
`{% generation %}...{% endgeneration %}`, which is what `apply_chat_template(..., return_assistant_tokens_mask=True)`
needs. The separator after the end-of-turn token (ChatML's newline after `<|im_end|>`) is left outside the
block: it is not trained (the usual convention: the model stops at `<|im_end|>` and never produces it).

- SMOLLM2: HuggingFaceTB/SmolLM2-*-Instruct, the exact string of its tokenizer (the realllm test in
  test_chat.py compares it with the local copy). ChatML with a default system prompt.
- QWEN25: Qwen/Qwen2.5-*-Instruct as published (ChatML, default system prompt "You are Qwen, ...", a tools
  block in the system turn). The tool-call branches (`tools`, `message.tool_calls`, role `tool`) are
  reproduced from the published template but are not exercised here: kdcache passes no tools.
- LLAMA3: meta-llama/Meta-Llama-3-*-Instruct as published (bos_token, headers, `| trim`, `<|eot_id|>`).
- LLAMA31: meta-llama/Llama-3.1-*-Instruct (the system turn always present with its knowledge/today dates,
  the system message trimmed and moved into it). Simplified: the tool-calling branches (custom/builtin tools,
  `tool_calls`, role `ipython`) are left out; with no tools the published template renders the same text.
- REASONING: not a published template but the shape of Qwen3's: the `<think>...</think>` of assistant turns
  before the last user message is dropped, so a conversation's earlier turns render differently once a later
  one follows (a prefix of the conversation does not render as a prefix of the whole).
"""

from __future__ import annotations


def _swap(template: str, old: str, new: str) -> str:
    """`template` with its one occurrence of `old` replaced by `new` (a marked variant from the published text)."""
    assert template.count(old) == 1, old
    return template.replace(old, new)


# ---- SmolLM2-Instruct ------------------------------------------------------------------------------------------

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}

# ---- Qwen2.5-Instruct -------------------------------------------------------------------------------------------

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The plain assistant turn, which the published template renders in the user's branch, gets a branch of its own.
QWEN25_MARKED = _swap(QWEN25, r"""
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
""", r"""
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
""")

QWEN25_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                 "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}

# ---- Llama-3-Instruct -------------------------------------------------------------------------------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3_MARKED = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                 "additional_special_tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                               "<|end_header_id|>", "<|eot_id|>"]}

# ---- Llama-3.1-Instruct (tool-calling branches left out) -------------------------------------------------------

LLAMA31 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA31_MARKED = _swap(LLAMA31, r"""
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
""", r"""
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}
            {{- message['content'] | trim + '<|eot_id|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
""")

LLAMA31_TOKENS = LLAMA3_TOKENS

# ---- a template that rewrites earlier turns (Qwen3's shape) ----------------------------------------------------

_REASONING_HEAD = r"""{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
"""

_REASONING_TAIL = r"""{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

REASONING = _REASONING_HEAD + r"""    {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
""" + _REASONING_TAIL

REASONING_MARKED = _REASONING_HEAD + r"""    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}{{- content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
""" + _REASONING_TAIL

REASONING_TOKENS = {"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}

# name -> (template, its generation-marked variant, the special tokens it needs, its end-of-turn token)
TEMPLATES = {
    "smollm2": (SMOLLM2, SMOLLM2_MARKED, SMOLLM2_TOKENS, "<|im_end|>"),
    "qwen25": (QWEN25, QWEN25_MARKED, QWEN25_TOKENS, "<|im_end|>"),
    "llama3": (LLAMA3, LLAMA3_MARKED, LLAMA3_TOKENS, "<|eot_id|>"),
    "llama31": (LLAMA31, LLAMA31_MARKED, LLAMA31_TOKENS, "<|eot_id|>"),
}
