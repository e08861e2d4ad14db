"""Tool calling: OpenAI's tools and tool_choice through a model's own Jinja template, forced calls
decoded under structured output, Hermes-format calls parsed from free replies, streamed or not,
over a real HTTP server with the official `openai` client."""

import json

import openai
import pytest

from colossuslm.data.chat import chat_template_of
from colossuslm.data.chat_template import load_model_tokenizer
from colossuslm.serve.api import ServerSettings
from colossuslm.serve.engine import EngineConfig
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.tool_calls import StreamedToolCalls, messages_for_template, parse_hermes, resolve_tool_use
from tests.serve_helpers import make_checkpoint, one_torch_thread, openai_client  # noqa: F401 (fixture)

# Qwen2.5's way with tools, shortened: definitions in the system turn, calls as <tool_call> JSON,
# results as <tool_response> in a user turn.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are helpful.{% endif %}

# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_call(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return list(args) == ["city", "days"] and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    return name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("tools"), max_seq_len=1024)  # tool definitions are long
    (ckpt / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return ckpt


@pytest.fixture(scope="module")
def client(checkpoint):
    settings = ServerSettings(model_name="tiny", tool_call_parser="hermes")
    with openai_client(checkpoint, settings, EngineConfig(max_num_seqs=4)) as client:
        yield client


def test_a_named_function_is_called_with_arguments_valid_for_its_schema(client):
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            seed=seed,
        )
        choice = reply.choices[0]
        assert choice.message.content is None and choice.finish_reason == "stop"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and valid_call(call.function.name, call.function.arguments)


def test_required_makes_one_or_more_calls_of_the_given_tools(client):
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=80, seed=3
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and all(valid_call(c.function.name, c.function.arguments) for c in calls)


def test_a_streamed_named_call_sends_the_name_then_the_arguments(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        stream=True,
    )
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id
    arguments = "".join(c.function.arguments or "" for c in calls)
    assert valid_call("get_weather", arguments)
    assert deltas[-1].finish_reason == "stop"


def test_auto_replies_with_text_when_the_model_calls_nothing(client):
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=12, seed=0)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_a_conversation_with_a_call_and_its_result_renders_through_the_template(client, checkpoint):
    turn = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}
    conversation = [*ASK, turn, result]
    text = chat_template_of(load_model_tokenizer(checkpoint)).render(
        messages_for_template(conversation), tools=[WEATHER]
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\nrain, 4 C\n</tool_response>" in text
    reply = client.chat.completions.create(model="tiny", messages=conversation, tools=[WEATHER], max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_hermes_calls_are_parsed_and_text_before_them_is_the_content():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    content, calls = parse_hermes(text + '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert parse_hermes("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_streamed_auto_holds_back_what_may_open_a_call():
    stream = StreamedToolCalls(resolve_tool_use([WEATHER], "auto", "hermes"))
    pieces = ["Let me ", "look. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    sent = [stream.delta(piece) for piece in pieces]
    assert sent == [{"content": "Let me "}, {"content": "look. "}, None, None]
    last, called = stream.finish()
    assert called and last["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    plain = StreamedToolCalls(resolve_tool_use([WEATHER], "auto", "hermes"))
    assert plain.delta("a <to") == {"content": "a "}  # "<to" may begin a call: held
    assert plain.finish() == ({"content": "<to"}, False)  # it did not: sent at the end


@pytest.mark.parametrize(
    ("tools", "choice", "parser", "param", "fragment"),
    [
        ([WEATHER], "auto", None, "tool_choice", "--tool-call-parser"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "hermes", "tool_choice", "not among"),
        ([WEATHER], "sometimes", "hermes", "tool_choice", "is invalid"),
        (None, "required", "hermes", "tool_choice", "needs tools"),
        ([{"type": "function", "function": {}}], "auto", "hermes", "tools", "name must be"),
        ([WEATHER, WEATHER], "auto", "hermes", "tools", "two functions"),
    ],
)
def test_tool_requests_that_cannot_be_done_are_refused(tools, choice, parser, param, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        resolve_tool_use(tools, choice, parser)
    assert info.value.param == param


def test_tools_are_refused_where_they_have_no_place(client, tmp_path):
    with pytest.raises(openai.BadRequestError) as info:  # completions take no tools
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"tools": [WEATHER]})
    assert info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as info:  # a forced call is already the output's constraint
        client.chat.completions.create(
            model="tiny",
            messages=ASK,
            tools=[WEATHER],
            tool_choice="required",
            extra_body={"guided_regex": "[a-z]+"},
        )
    assert info.value.body["param"] == "tool_choice"
    chatml = make_checkpoint(tmp_path)  # ChatML: no place for tool definitions
    with openai_client(chatml, ServerSettings(model_name="m", tool_call_parser="hermes")) as plain:
        with pytest.raises(openai.BadRequestError) as info:
            plain.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=2)
        assert info.value.body["param"] == "tools" and "no place for tool" in info.value.body["message"]
