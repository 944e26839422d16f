# Sends N sequential chat requests over one keep-alive connection: drive.py PORT N json|stream
import http.client, json, sys, time
port, n, stream = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "stream"
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port); c.request("GET", "/"); c.getresponse().read(); break
    except Exception: time.sleep(0.1)
c = http.client.HTTPConnection("127.0.0.1", port)
body = json.dumps({"model": "mock/m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
for _ in range(n):
    c.request("POST", "/v1/chat/completions", body, {"authorization": "Bearer test-proxy-key-0123456789", "content-type": "application/json"})
    r = c.getresponse(); d = r.read(); assert r.status == 200, (r.status, d)
