// Builds the two committed bundles from src/: dist/streamfarm.min.js (an IIFE that defines the
// global `streamfarm`, for a <script> tag; the node serves it at /client/streamfarm.js) and
// dist/streamfarm.min.mjs (an ES module). With --check, builds in memory and fails when the
// committed files differ: the Rust node embeds dist/streamfarm.min.js, so a stale bundle would
// ship old code.
import { build } from 'esbuild';
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
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
if (stale.length > 0) {
  console.error(`stale bundle: ${stale.join(', ')} differ from a build of src/; run \`npm run build\` in clients/browser and commit dist/`);
  process.exit(1);
}
