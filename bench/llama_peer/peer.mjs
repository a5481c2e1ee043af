// Times llama.cpp (node-llama-cpp's prebuilt CPU libraries) on a GGUF written by
// to_gguf.py, with the prompt, decode and batch shapes model_bench uses:
//   node peer.mjs MODEL.gguf --prompt 512 --decode 32 --repeats 2 --threads 2 --batch 1,4,16 --batch-steps 16
//                    [--no-mmap] [--flash-attention on|off|auto]
// Prompts are token ids ((i*7919 + 13) % vocab), the ids model_bench feeds.
//   node peer.mjs MODEL.gguf --prompts FILE --greedy N
// instead prints N greedy tokens for each prompt of FILE (epic-run's --tokens form:
// ids joined by ',', prompts by ';'), one line each, as epic-run does, for agreement.
import fs from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const args = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : fallback;
};
const modelPath = args[0];
const prompt = Number(opt("prompt", 512));
const decode = Number(opt("decode", 32));
const repeats = Number(opt("repeats", 2));
const threads = Number(opt("threads", 2));
const batches = String(opt("batch", "")).split(",").filter(Boolean).map(Number);
const batchSteps = Number(opt("batch-steps", 16));
const greedy = Number(opt("greedy", 0));
// llama.cpp's flash attention, on by default: its prefill measured 1.2-1.4x faster with
// it on small experts, the same on V2-Lite's shape ("auto" lets llama.cpp choose).
const flashAttention = { on: true, off: false, auto: "auto" }[opt("flash-attention", "on")];
if (flashAttention === undefined) throw new Error(`--flash-attention must be on, off or auto`);
if (opt("prompts") && !(greedy > 0)) throw new Error(`--prompts needs --greedy N (N > 0)`);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor((s.length - 1) / 2)]; };
const now = () => Number(process.hrtime.bigint()) / 1e9;

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.warn, maxThreads: threads });
const model = await llama.loadModel({ modelPath, gpuLayers: 0, useMmap: !args.includes("--no-mmap") });
const nVocab = Number(model.fileInfo.metadata.deepseek2?.vocab_size);
if (!(nVocab > 0)) throw new Error(`${modelPath}: no deepseek2.vocab_size (not written by to_gguf.py?)`);
const promptTokens = (n, salt = 0) => Array.from({ length: n }, (_, i) => ((i + salt) * 7919 + 13) % nVocab);
if (opt("prompts")) {
  const context = await model.createContext({ contextSize: 4096, threads, flashAttention });
  for (const ids of fs.readFileSync(opt("prompts"), "utf8").trim().split(";")) {
    const seq = context.getSequence();
    const out = [];
    for await (const token of seq.evaluate(ids.split(",").map(Number), { temperature: 0 })) {
      out.push(token);
      if (out.length >= greedy) break;
    }
    console.log(out.join(" "));
    seq.dispose();
  }
  process.exit(0);
}
console.log(`llama.cpp (node-llama-cpp ${llama.buildType ?? ""} ${llama.llamaCppRelease?.release ?? ""}), ` +
            `cpu backend, ${threads} threads; model ${modelPath}`);

{
  const context = await model.createContext({ contextSize: prompt + decode + 16, batchSize: prompt, threads, flashAttention });
  const prefill = [], steps = [];
  // Round 0 warms the weights' pages and the thread pool; it is not counted.
  for (let r = 0; r <= repeats; ++r) {
    const seq = context.getSequence();
    // The first yield ends the prompt's evaluation (time to first token); each later
    // yield is one decode step.
    let yields = 0;
    let t0 = now();
    for await (const _ of seq.evaluate(promptTokens(prompt), { temperature: 0 })) {
      const t1 = now();
      if (r > 0) (yields === 0 ? prefill : steps).push(t1 - t0);
      if (++yields > decode) break;
      t0 = now();
    }
    seq.dispose();
  }
  const p = median(prefill);
  console.log(`prefill: ${prompt} tokens in ${p.toFixed(3)} s (median of ${repeats}) = ${(prompt / p).toFixed(1)} tok/s`);
  const s = median(steps);
  console.log(`decode: ${(1 / s).toFixed(2)} tok/s (median step ${(s * 1e3).toFixed(2)} ms, context ${prompt + 1}..${prompt + decode})`);
  await context.dispose();
}

for (const b of batches) {
  const ctxTokens = 32;
  const context = await model.createContext({ contextSize: b * (ctxTokens + batchSteps + 8), sequences: b,
                                              batchSize: Math.max(512, b * ctxTokens), threads, flashAttention });
  const seqs = Array.from({ length: b }, () => context.getSequence());
  await Promise.all(seqs.map((s, i) => s.evaluateWithoutGeneratingNewTokens(promptTokens(ctxTokens, i * 31))));
  // All sequences step together: node-llama-cpp batches their pending tokens into one decode.
  const t0 = now();
  await Promise.all(seqs.map(async (s, i) => {
    let n = 0;
    for await (const _ of s.evaluate([promptTokens(1, i * 31 + ctxTokens)[0]], { temperature: 0 })) {
      if (++n >= batchSteps) break;
    }
  }));
  const t = now() - t0;
  console.log(`batch ${b}: ${(b * batchSteps / t).toFixed(1)} tok/s (${(t / batchSteps * 1e3).toFixed(2)} ms a step, ${batchSteps} steps, ${ctxTokens} context tokens a sequence)`);
  await context.dispose();
}
await model.dispose();
