# The signatures of middleware/_rpc_send.c; middleware/_rpc_send_py.py is the
# same thing in Python and says what each does.
from typing import Any, Callable, final, Optional

from commlens.tracer._speedups import TraceContext

@final
class Sender:
    def __init__(self, *, service: str, recorder: Any, sent_metric: str,
                 reply_wait_metric: str, method_label: Callable[[Any], str],
                 context_copy: Callable[[Any], Any],
                 stamp: Callable[[dict[str, Any], str, str], TraceContext],
                 failed: Callable[[Send, BaseException, float], object],
                 add_hop: Callable[[Send, str, Optional[str], float], object],
                 recording_failed: Callable[[BaseException], object],
                 inner_send: Callable[..., Any]) -> None: ...
    def send(self, target: Any, ctxt: Any, message: Any, wait_for_reply: object = None,
             timeout: Optional[float] = None, call_monitor_timeout: Optional[float] = None,
             retry: Optional[int] = None, transport_options: Any = None) -> Any: ...
    def begin(self, target: Any, ctxt: Any, message: Any, wait_for_reply: object,
              /) -> Optional[Send]: ...
    def take_open_calls(self) -> set[Any]: ...

@final
class Send:
    """Made by Sender.begin only."""
    @property
    def start(self) -> float: ...
    @property
    def ctxt(self) -> dict[str, Any]: ...
    @property
    def ctx(self) -> TraceContext: ...
    @property
    def kind(self) -> str: ...
    @property
    def topic(self) -> Optional[str]: ...
    @property
    def method(self) -> str: ...
    @property
    def token(self) -> Any: ...
    def end(self, exc: Optional[BaseException], /) -> None: ...
