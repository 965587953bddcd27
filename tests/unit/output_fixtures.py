"""Chat-template fixtures carrying each tool-call family's markup, and model outputs in each
format (written for the tests; shaped like the families' real templates)."""

from __future__ import annotations

from engine.output.events import ToolSpec

HERMES = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools>\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}'
    "{%- for m in messages %}{%- if m.tool_calls %}{%- for tool_call in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}"}\n</tool_call>{%- endfor %}{%- endif %}'
    "{%- endfor %}"
)
QWEN3_CODER = (
    "{%- if tools %}<tools>{% for t in tools %}<function><name>{{ t.function.name }}</name>"
    "</function>{% endfor %}</tools>\nIf you choose to call a function ONLY reply in the "
    "following format:\n<tool_call>\n<function=example_function_name>\n<parameter="
    "example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}{%- if tools is not none %}<|start_header_id|>system<|end_header_id|>\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.{%- endif %}{%- for m in messages %}{%- if m.role == 'ipython' %}"
    "<|python_tag|>{%- endif %}{%- endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    "{%- for m in messages %}{%- if m.tool_calls %}[TOOL_CALLS][{%- for tc in m.tool_calls %}"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}'
    "{%- endfor %}]</s>{%- elif tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
    "[/AVAILABLE_TOOLS][INST]{{ m.content }}[/INST]{%- endif %}{%- endfor %}"
)
CHATML_NO_TOOLS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEMPLATES = {
    "hermes": HERMES,
    "qwen3_coder": QWEN3_CODER,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "generic": CHATML_NO_TOOLS,
}

WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["location"],
    },
)
TIME = ToolSpec(
    "get_time",
    "The time in a timezone",
    {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
)
TOOLS = [WEATHER, TIME]

# (format, model output, expected content, expected [(name, arguments)])
OUTPUTS = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n'
        "</tool_call>",
        "Let me check.\n",
        [("get_weather", {"location": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    ("hermes", "No tools needed: 1 < 2 and <tool is not a call.", None, []),
    (
        "qwen3_coder",
        "<tool_call>\n<function=get_weather>\n<parameter=location>\nNew York\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        "",
        [("get_weather", {"location": "New York", "days": 3})],
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"location": "Oslo"}}',
        "",
        [("get_weather", {"location": "Oslo"})],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}; '
        '{"name": "get_weather", "parameters": {"location": "Rome", "days": 2}}',
        "",
        [("get_time", {"tz": "UTC"}), ("get_weather", {"location": "Rome", "days": 2})],
    ),
    ("llama3", "It is sunny {probably}.", None, []),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Lima"}}]',
        "Sure. ",
        [("get_weather", {"location": "Lima"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_time[ARGS]{"tz": "PST"}',
        "",
        [("get_time", {"tz": "PST"})],
    ),
    (
        "generic",
        '{"tool_calls": [{"name": "get_weather", "arguments": {"location": "Kyiv"}}]}',
        "",
        [("get_weather", {"location": "Kyiv"})],
    ),
    (
        "generic",
        '{"response": "Hello there, <tool_call> is just text"}',
        "Hello there, <tool_call> is just text",
        [],
    ),
]
