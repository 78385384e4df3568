// Builds the committed files of dist/ from src/: dist/streamfarm.min.js (an IIFE that defines the
// global `streamfarm`, for a <script> tag; the node serves it at /client/streamfarm.js),
// dist/streamfarm.min.mjs (an ES module), and dist/types/*.d.ts (the declarations TypeScript
// emits, for the package's `types`). With --check, builds aside and fails when the committed files
// differ: the Rust node embeds dist/streamfarm.min.js, so a stale bundle would ship old code.
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { gzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const banner = '/* streamfarm browser client — built from clients/browser/src by `npm run build`; do not edit */';
const common = {
  entryPoints: [join(root, 'src/index.ts')],
  bundle: true,
  minify: true,
  target: 'es2020',
  legalComments: 'none',
  banner: { js: banner },
  write: false,
  logLevel: 'warning',
};
const outputs = [
  { file: 'dist/streamfarm.min.js', options: { format: 'iife', globalName: 'streamfarm' } },
  { file: 'dist/streamfarm.min.mjs', options: { format: 'esm' } },
];
let stale = [];
for (const { file, options } of outputs) {
  const result = await build({ ...common, ...options });
  const text = result.outputFiles[0].text;
  const path = join(root, file);
  if (check) {
    let committed = '';
    try {
      committed = readFileSync(path, 'utf8');
    } catch {}
    if (committed !== text) stale.push(file);
  } else {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, text);
  }
  const gz = gzipSync(Buffer.from(text), { level: 9 }).length;
  console.log(`${file}: ${text.length} bytes minified, ${gz} bytes gzipped`);
}
// The declarations: TypeScript's own emit of src/, into a scratch folder, then compared or copied.
const tsc = join(dirname(createRequire(import.meta.url).resolve('typescript/package.json')), 'bin', 'tsc');
const scratch = mkdtempSync(join(tmpdir(), 'streamfarm-types-'));
try {
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json'), '--noEmit', 'false', '--declaration', '--emitDeclarationOnly', '--outDir', scratch], { stdio: 'inherit' });
  const typesDir = join(root, 'dist/types');
  const emitted = readdirSync(scratch).sort();
  let committed = [];
  try {
    committed = readdirSync(typesDir).sort();
  } catch {}
  if (check) {
    const differ = emitted.filter((f) => {
      try {
        return readFileSync(join(typesDir, f), 'utf8') !== readFileSync(join(scratch, f), 'utf8');
      } catch {
        return true;
      }
    });
    stale.push(...differ.map((f) => `dist/types/${f}`), ...committed.filter((f) => !emitted.includes(f)).map((f) => `dist/types/${f} (no source)`));
  } else {
    rmSync(typesDir, { recursive: true, force: true });
    mkdirSync(typesDir, { recursive: true });
    for (const f of emitted) writeFileSync(join(typesDir, f), readFileSync(join(scratch, f)));
  }
  console.log(`dist/types: ${emitted.length} declaration files`);
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
if (stale.length > 0) {
  console.error(`stale bundle: ${stale.join(', ')} differ from a build of src/; run \`npm run build\` in clients/browser and commit dist/`);
  process.exit(1);
}
