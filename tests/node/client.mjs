// The Node `openai` SDK as a client of hxgwd, driven by tests/test_openai_node.py.
//
// Reads a plan on stdin:
//   {"base_url": "http://127.0.0.1:PORT/v1", "key": "sk-...", "models": {"chat": "chat", ...},
//    "calls": ["chat", "chat_stream", ...]}
// and prints one JSON object on stdout: {"node": "v18.20.4", "sdk": "6.49.0", "results": {call: result}},
// where a call the SDK threw on gives {"error": {"class", "status", "message"}} instead of failing the
// others. Results are plain facts (texts, lengths, usage, a few bytes) for the test to assert on.
import OpenAI, { toFile } from 'openai';
import { VERSION } from 'openai/version';

// openai 6.x checks for a global File before an upload; Node 18 (Debian 12's) has it in node:buffer only.
if (typeof globalThis.File === 'undefined') {
  globalThis.File = (await import('node:buffer')).File;
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const plan = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const models = { chat: 'chat', embedding: 'emb', moderation: 'mod', speech: 'tts', transcription: 'stt',
                 image: 'img', ...(plan.models ?? {}) };

const client = (apiKey = plan.key) => new OpenAI({ baseURL: plan.base_url, apiKey, maxRetries: 0, timeout: 20000 });
const c = client();
const user = (content) => [{ role: 'user', content }];
const state = {};   // what one call leaves for a later one (the response id)

const calls = {
  async chat() {
    const r = await c.chat.completions.create({ model: models.chat, messages: user('hello HX') });
    return { id: r.id, object: r.object, model: r.model, content: r.choices[0].message.content,
             finish_reason: r.choices[0].finish_reason, usage: r.usage };
  },

  async chat_stream() {
    const stream = await c.chat.completions.create({
      model: models.chat, messages: user('one two three'), stream: true, stream_options: { include_usage: true },
    });
    const pieces = [];
    let usage = null, chunks = 0, finish = null, emptyChoices = 0;
    for await (const chunk of stream) {
      chunks += 1;
      if (chunk.choices.length === 0) emptyChoices += 1;
      for (const choice of chunk.choices) {
        pieces.push(choice.delta?.content ?? '');
        finish = choice.finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    return { text: pieces.join(''), chunks, empty_choices: emptyChoices, finish_reason: finish, usage };
  },

  async embeddings() {
    // the Node SDK asks for base64 when no encoding_format is given and decodes it to floats itself
    const b64 = await c.embeddings.create({ model: models.embedding, input: ['a', 'b'] });
    const floats = await c.embeddings.create({ model: models.embedding, input: 'a', encoding_format: 'float' });
    return { count: b64.data.length, dims: b64.data.map((d) => d.embedding.length),
             first: b64.data[0].embedding, float_first: floats.data[0].embedding, usage: b64.usage };
  },

  async responses_create() {
    const r = await c.responses.create({ model: models.chat, input: 'hello responses' });
    state.response_id = r.id;
    return { id: r.id, status: r.status, output_text: r.output_text, usage: r.usage };
  },

  async responses_retrieve() {
    const r = await c.responses.retrieve(state.response_id);
    return { id: r.id, output_text: r.output_text };
  },

  async responses_stream() {
    const stream = c.responses.stream({ model: models.chat, input: 'one two three' });
    const deltas = [], types = [];
    for await (const event of stream) {
      types.push(event.type);
      if (event.type === 'response.output_text.delta') deltas.push(event.delta);
    }
    const final = await stream.finalResponse();
    return { deltas, types, output_text: final.output_text, usage: final.usage };
  },

  async responses_stream_create() {
    // the lower-level form: create({stream: true}) gives the raw events
    const stream = await c.responses.create({ model: models.chat, input: 'four five six seven', stream: true });
    const deltas = [];
    let usage = null;
    for await (const event of stream) {
      if (event.type === 'response.output_text.delta') deltas.push(event.delta);
      if (event.type === 'response.completed') usage = event.response.usage;
    }
    return { text: deltas.join(''), usage };
  },

  async responses_delete() {
    const deleted = await c.responses.delete(state.response_id);
    try {
      await c.responses.retrieve(state.response_id);
      return { deleted: deleted ?? null, after: null };
    } catch (err) {
      return { deleted: deleted ?? null, after: describe(err) };
    }
  },

  async moderations() {
    const r = await c.moderations.create({ model: models.moderation, input: ['fine', 'hx-flag this'] });
    return { model: r.model, flagged: r.results.map((x) => x.flagged) };
  },

  async speech() {
    const r = await c.audio.speech.create({ model: models.speech, input: 'four words of audio', voice: 'alloy',
                                             response_format: 'wav' });
    const bytes = Buffer.from(await r.arrayBuffer());
    return { status: r.status, content_type: r.headers.get('content-type'), length: bytes.length,
             head: bytes.subarray(0, 12).toString('latin1') };
  },

  async transcription() {
    // file first, as the SDK's README writes it; toFile is how the SDK wraps a Buffer
    const file = await toFile(Buffer.concat([Buffer.from('RIFF'), Buffer.alloc(4000)]), 'hello.wav',
                              { type: 'audio/wav' });
    const r = await c.audio.transcriptions.create({ file, model: models.transcription });
    return { text: r.text, usage: r.usage ?? null };
  },

  async images() {
    const r = await c.images.generate({ model: models.image, prompt: 'a cat', n: 2, response_format: 'b64_json' });
    return { count: r.data.length, png: r.data.map((d) => Buffer.from(d.b64_json, 'base64').subarray(0, 8).toString('hex')),
             usage: r.usage ?? null };
  },

  async models() {
    const ids = [];
    for await (const m of c.models.list()) ids.push(m.id);
    return { ids };
  },

  async rate_limit() {
    // three chats in a row with the plan's key (one with rpm = 2): the SDK does not retry (maxRetries 0)
    const outcomes = [];
    for (let i = 0; i < 3; i++) {
      try {
        const r = await c.chat.completions.create({ model: models.chat, messages: user('hello HX') });
        outcomes.push({ content: r.choices[0].message.content });
      } catch (err) {
        outcomes.push({ error: describe(err), retry_after: err?.headers?.get?.('retry-after') ?? null });
      }
    }
    return { outcomes };
  },

  async bad_key() {
    try {
      await client('sk-wrong').models.list();
      return { error: null };
    } catch (err) {
      return { error: describe(err), authentication_error: err instanceof OpenAI.AuthenticationError,
               api_error: err instanceof OpenAI.APIError };
    }
  },
};

function describe(err) {
  return { class: err?.constructor?.name ?? String(err), status: err?.status ?? null,
           message: String(err?.message ?? err), type: err?.type ?? null, code: err?.code ?? null };
}

const results = {};
for (const name of plan.calls) {
  const call = calls[name];
  if (!call) { results[name] = { error: { class: 'UnknownCall', status: null, message: name } }; continue; }
  try {
    results[name] = await call();
  } catch (err) {
    results[name] = { error: describe(err) };
  }
}
process.stdout.write(JSON.stringify({ node: process.version, sdk: VERSION, results }) + '\n');
