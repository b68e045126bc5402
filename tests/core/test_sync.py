from llmrouter import SyncRouter
from llmrouter.testing.scripted import ScriptedProvider, Step


def test_sync_facade_chat_stream_and_close():
    router = SyncRouter()
    provider = ScriptedProvider(default=Step(text="a b c"))
    router.router.add_deployment("g", provider)
    with router:
        reply = router.chat({"model": "g", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.choices[0].message.content == "a b c"
        pieces = [
            c.choices[0].delta.content
            for c in router.stream({"model": "g", "messages": [{"role": "user", "content": "hi"}]})
            if c.choices
        ]
        assert "".join(p or "" for p in pieces) == "a b c"
        assert [m.id for m in router.list_models().data] == ["g"]
    assert provider.closed
