// Reading OneLLM Serve's answer stream with plain `fetch`, in a browser or Node 18+:
//   node fetch_sse.js cat.jpg "What is in this image?"      (ONELLM_URL picks the server)
// `EventSource` cannot POST a file, so the stream is parsed by hand: events are separated by a
// blank line, each `data:` line holds one chat.completion.chunk, and `data: [DONE]` ends it.

async function chat(url, form, onDelta) {
  const response = await fetch(`${url}/v1/chat`, { method: "POST", body: form });
  if (!response.ok) throw new Error((await response.json()).error.message);
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const bytes of response.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (event.startsWith("event: error")) throw new Error(chunk.error.message);
      onDelta(chunk.choices[0]?.delta?.content ?? "");
    }
  }
}

// In a page: form.append("image", fileInput.files[0]). Here, from the command line:
async function main() {
  const { openAsBlob } = await import("node:fs");
  const [image = "cat.jpg", prompt = "What is in this image?"] = process.argv.slice(2);
  const form = new FormData();
  form.append("image", await openAsBlob(image), image);
  form.append("prompt", prompt);
  await chat(process.env.ONELLM_URL ?? "http://127.0.0.1:8080", form, (text) => process.stdout.write(text));
  process.stdout.write("\n");
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = 1;
});
