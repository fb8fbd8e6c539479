// opad's live page: the public images API (the one the openai client uses) from a browser.
// No build step, no dependency, nothing from another origin. The API key lives in this script's
// memory only: never in the address, the browser's storage or a cookie.
"use strict";

(() => {
  const GALLERY_SIZE = 8;
  const DEBOUNCE_MS = 250;
  const BASE = "base"; // the id of the student without a concept
  const MAX_SEED = 4294967295;

  const $ = (id) => document.getElementById(id);
  const el = {
    keyForm: $("key-form"), key: $("key"), form: $("request-form"), prompt: $("prompt"), model: $("model"),
    refresh: $("refresh"), steps: $("steps"), n: $("n"), seed: $("seed"), seedRandom: $("seed-random"),
    seedKeep: $("seed-keep"), live: $("live"), message: $("message"), result: $("result"), timing: $("timing"),
    copyCurl: $("copy-curl"), copyPython: $("copy-python"), snippet: $("snippet"), snippetLabel: $("snippet-label"),
    gallery: $("gallery"),
  };

  let apiKey = "";
  let keyNeeded = false; // the server answered 401 once: it has a key
  let timer = 0;
  let wanted = 0; // the number of the newest request asked for
  let busy = false; // one request in flight at a time
  let again = false; // a newer request was asked for while one was in flight: it runs next ("latest wins")
  let lastSeed = null;
  let snippetKind = "curl";
  const gallery = []; // the newest first: {src, url, prompt, model, steps, seed}

  function say(text, kind) {
    el.message.textContent = text;
    el.message.classList.toggle("error", kind === "error");
  }

  function headers(json) {
    const sent = {};
    if (json) sent["Content-Type"] = "application/json";
    if (apiKey) sent.Authorization = "Bearer " + apiKey;
    return sent;
  }

  async function problem(response) {
    if (response.status === 401) {
      keyNeeded = true;
      el.keyForm.hidden = false;
      updateSnippet();
      return apiKey ? "The API key was refused: check it and enter it again above."
        : "The server needs an API key: enter it above.";
    }
    let message = response.statusText || "error";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON: the status line says it */ }
    return `The server answered ${response.status}: ${message}`;
  }

  function label(model) {
    return model === BASE ? "no concept (base)" : model;
  }

  async function loadModels() {
    say("Loading the concepts…");
    let response;
    try {
      response = await fetch("v1/models", { headers: headers(false), cache: "no-store" });
    } catch (e) {
      say(`Cannot reach the server (${e.message}).`, "error");
      return;
    }
    if (!response.ok) {
      say(await problem(response), "error");
      if (response.status === 401) el.key.focus();
      return;
    }
    const ids = (await response.json()).data.map((m) => m.id);
    const chosen = el.model.value;
    el.model.replaceChildren(...ids.map((id) => new Option(label(id), id)));
    el.model.value = ids.includes(chosen) ? chosen : BASE;
    const count = ids.filter((id) => id !== BASE).length;
    say(`${apiKey ? "Key accepted. " : ""}${count} concept${count === 1 ? "" : "s"} served; type a prompt.`);
    updateSnippet();
    if (el.live.checked && el.prompt.value.trim()) ask();
  }

  // --- the request -------------------------------------------------------------------------------

  function currentRequest() {
    const body = { model: el.model.value || BASE, prompt: el.prompt.value, n: Number(el.n.value),
      steps: Number(el.steps.value), response_format: "b64_json" };
    const seed = el.seed.value.trim().toLowerCase();
    if (seed && seed !== "random") body.seed = /^\d{1,10}$/.test(seed) ? Number(seed) : NaN;
    return body;
  }

  function invalid(body) {
    if (!body.prompt.trim()) return "Type a prompt.";
    if ("seed" in body && !(body.seed <= MAX_SEED)) return `The seed is a whole number from 0 to ${MAX_SEED}, or random.`;
    if (!(Number.isInteger(body.n) && body.n >= 1 && body.n <= 4)) return "Images: a whole number from 1 to 4.";
    return null;
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(ask, DEBOUNCE_MS);
  }

  function ask() {
    clearTimeout(timer);
    const why = invalid(currentRequest());
    if (why) {
      say(why, el.prompt.value.trim() ? "error" : undefined);
      return;
    }
    wanted += 1;
    if (busy) {
      again = true; // the answer in flight will be dropped, and the newest form state asked for
      return;
    }
    run();
  }

  async function run() {
    busy = true;
    try {
      do {
        again = false;
        const body = currentRequest();
        if (invalid(body)) break;
        await generate(wanted, body);
      } while (again);
    } finally {
      busy = false;
    }
  }

  function parseTiming(header) {
    return (header || "").split(",").map((part) => {
      const [name, ...params] = part.split(";").map((s) => s.trim());
      const dur = params.find((p) => p.startsWith("dur="));
      return { name, ms: dur ? Number(dur.slice(4)) : NaN };
    }).filter((stage) => stage.name && Number.isFinite(stage.ms));
  }

  const ms = (value) => (value < 10 ? value.toFixed(1) : value.toFixed(0));

  async function generate(number, body) {
    say("Generating…");
    el.result.setAttribute("aria-busy", "true");
    const started = performance.now();
    try {
      let response;
      try {
        response = await fetch("v1/images/generations", { method: "POST", headers: headers(true),
          body: JSON.stringify(body), cache: "no-store" });
      } catch (e) {
        if (number === wanted) say(`Cannot reach the server (${e.message}).`, "error");
        return;
      }
      if (!response.ok) {
        const why = await problem(response);
        if (number === wanted) say(why, "error");
        return;
      }
      const answer = await response.json();
      const roundTrip = performance.now() - started;
      if (number !== wanted) return; // stale: a newer request was asked for while this one ran
      const seed = Number(response.headers.get("X-Opad-Seed"));
      show(body, answer, parseTiming(response.headers.get("Server-Timing")), roundTrip, seed);
    } finally {
      el.result.removeAttribute("aria-busy");
    }
  }

  // --- showing images ----------------------------------------------------------------------------

  function pngUrl(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
  }

  function describe(image) {
    const steps = `${image.steps} step${image.steps === 1 ? "" : "s"}`;
    return `${label(image.model)}, ${steps}, seed ${image.seed}`;
  }

  function figure(image) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `Generated image of “${image.prompt}” (${describe(image)})`;
    img.decoding = "async";
    img.addEventListener("load", () => img.classList.toggle("pixelated", img.naturalWidth < 256));
    img.src = image.src;
    const caption = document.createElement("figcaption");
    const text = document.createElement("span");
    text.className = "params";
    text.textContent = `“${image.prompt}” · ${describe(image)}`;
    const link = document.createElement("a");
    link.className = "button secondary download";
    link.href = image.url;
    link.download = `opad-${image.model}-seed${image.seed}.png`;
    link.textContent = "Download";
    link.setAttribute("aria-label", `Download the image of “${image.prompt}” (${describe(image)})`);
    caption.append(text, link);
    fig.append(img, caption);
    return fig;
  }

  function show(body, answer, stages, roundTrip, seed) {
    const images = answer.data.map((item, i) => ({
      src: "data:image/png;base64," + item.b64_json, url: pngUrl(item.b64_json),
      prompt: item.revised_prompt || body.prompt, model: body.model, steps: body.steps, seed: seed + i,
    }));
    el.result.replaceChildren(...images.map(figure));
    const total = stages.reduce((sum, stage) => sum + stage.ms, 0);
    const parts = stages.map((stage) => `${stage.name} ${ms(stage.ms)}`).join(" · ");
    el.timing.textContent = `Server ${ms(total)} ms (${parts}) · round trip ${ms(roundTrip)} ms · seed ${seed}`
      + (images.length > 1 ? `–${seed + images.length - 1}` : "");
    lastSeed = seed;
    el.seedKeep.disabled = false;
    say(`${images.length === 1 ? "Image" : `${images.length} images`} ready in ${ms(roundTrip)} ms.`);
    gallery.unshift(...images);
    for (const gone of gallery.splice(GALLERY_SIZE)) URL.revokeObjectURL(gone.url);
    el.gallery.replaceChildren(...gallery.map((image) => {
      const item = document.createElement("li");
      item.append(figure(image));
      return item;
    }));
  }

  // --- the request as code -----------------------------------------------------------------------

  const shellQuote = (s) => "'" + s.replace(/'/g, "'\\''") + "'";
  const pyString = (s) => JSON.stringify(s); // a JSON string is a valid Python string literal

  function curlText(body, url) {
    const lines = [`curl -sS ${url}/images/generations \\`];
    if (keyNeeded) lines.push('  -H "Authorization: Bearer $OPAD_API_KEY" \\');
    lines.push('  -H "Content-Type: application/json" \\');
    lines.push(`  -d ${shellQuote(JSON.stringify(body))} \\`);
    lines.push("  | python3 -c 'import base64, json, sys; open(\"image.png\", \"wb\")"
      + ".write(base64.b64decode(json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))'");
    return lines.join("\n") + "\n";
  }

  function pythonText(body, url) {
    const extra = ["seed" in body ? `"seed": ${body.seed}` : null, `"steps": ${body.steps}`].filter(Boolean);
    return [
      "import base64",
      ...(keyNeeded ? ["import os"] : []),
      "",
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${pyString(url)}, api_key=${keyNeeded ? 'os.environ["OPAD_API_KEY"]' : '"unused"'})`,
      `result = client.images.generate(model=${pyString(body.model)}, prompt=${pyString(body.prompt)}, n=${body.n},`,
      `                                response_format="b64_json", extra_body={${extra.join(", ")}})`,
      "for i, image in enumerate(result.data):",
      '    with open(f"image-{i}.png", "wb") as f:',
      "        f.write(base64.b64decode(image.b64_json))",
      "",
    ].join("\n");
  }

  function updateSnippet() {
    const body = currentRequest();
    const url = new URL("v1", document.baseURI).href;
    const why = invalid(body);
    el.snippetLabel.textContent = snippetKind === "curl" ? "curl" : "Python (openai client)";
    el.snippet.value = why ? `# ${why}\n` : snippetKind === "curl" ? curlText(body, url) : pythonText(body, url);
  }

  async function copy(kind, name) {
    snippetKind = kind;
    updateSnippet();
    try {
      if (!(navigator.clipboard && window.isSecureContext)) throw new Error("no clipboard");
      await navigator.clipboard.writeText(el.snippet.value);
      say(`Copied as ${name}.`);
    } catch (e) {
      el.snippet.focus();
      el.snippet.select();
      say(`The text below is the request as ${name}: copy it with Ctrl+C (the clipboard was not available).`);
    }
  }

  // --- wiring ------------------------------------------------------------------------------------

  function changed() {
    updateSnippet();
    if (el.live.checked) schedule();
  }

  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = el.key.value.trim();
    loadModels();
  });
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      updateSnippet();
      ask();
    }
  });
  for (const input of [el.prompt, el.seed, el.n]) input.addEventListener("input", changed);
  for (const input of [el.model, el.steps]) input.addEventListener("change", changed);
  el.live.addEventListener("change", () => el.live.checked && el.prompt.value.trim() && ask());
  el.refresh.addEventListener("click", loadModels);
  el.seedRandom.addEventListener("click", () => {
    el.seed.value = "random";
    changed();
  });
  el.seedKeep.addEventListener("click", () => {
    if (lastSeed === null) return;
    el.seed.value = String(lastSeed);
    changed();
  });
  el.copyCurl.addEventListener("click", () => copy("curl", "curl"));
  el.copyPython.addEventListener("click", () => copy("python", "Python (openai client)"));

  updateSnippet();
  loadModels();
})();
