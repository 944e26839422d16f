# The mock upstream for count.sh: a chat completion, or a 12-event stream, answered at once.
import http.server, json, sys
BODY = json.dumps({"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}).encode()
CHUNK = lambda t: ("data: " + json.dumps({"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":t},"finish_reason":None}]}) + "\n\n")
STREAM = ("".join(CHUNK(w) for w in ["Hello"," there",","," how"," can"," I"," help"," you"," today","?"," Bye","."]) + "data: [DONE]\n\n").encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        n = int(self.headers.get("content-length", 0)); body = json.loads(self.rfile.read(n) or b"{}")
        out, ctype = (STREAM, "text/event-stream") if body.get("stream") else (BODY, "application/json")
        self.send_response(200); self.send_header("content-type", ctype); self.send_header("content-length", str(len(out))); self.end_headers(); self.wfile.write(out)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
