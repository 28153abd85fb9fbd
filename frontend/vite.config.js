// Builds the viewer into dist/ with fixed names (viewer.js, viewer.css) that Django serves
// as static files: the templates load {% static 'viewer.js' %} and {% static 'viewer.css' %}.
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const SYNC_UNIFORMS = fileURLToPath(
  new URL('./node_modules/@pixi/unsafe-eval/lib/syncUniforms.mjs', import.meta.url),
);
const SHADER_SYSTEM =
  /class (\w+) \{\s*\/\*\* @param renderer - The renderer this System works for\. \*\/\s*constructor\(t\) \{\s*this\.destroyed = !1, this\.renderer = t, this\.systemCheck\(\)/;

/**
 * Annotorious bundles its own PixiJS, whose shader system compiles uniform setters with
 * `new Function`, which the portal's Content-Security-Policy (no 'unsafe-eval') forbids.
 * PixiJS's own remedy, @pixi/unsafe-eval, patches the shader system's prototype; the bundled
 * class is not exported, so the same patch is applied here, inside that module, at build time.
 */
function pixiWithoutEval() {
  return {
    name: 'pixi-without-eval',
    transform(code, id) {
      if (!id.includes('annotorious-openseadragon.es.js')) return null;
      const match = code.match(SHADER_SYSTEM);
      if (!match) this.error('PixiJS ShaderSystem not found in the Annotorious bundle: update the pixi-without-eval patch');
      return `import { syncUniforms as __syncUniformsNoEval } from ${JSON.stringify(SYNC_UNIFORMS)};
${code}
Object.assign(${match[1]}.prototype, {
  systemCheck() {},
  syncUniforms(group, glProgram) {
    const { shader, renderer } = this;
    __syncUniformsNoEval(group, shader.program.uniformData, glProgram.uniformData, group.uniforms, renderer);
  },
});
`;
    },
  };
}

export default defineConfig({
  base: '/static/',
  publicDir: false,
  plugins: [pixiWithoutEval()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    sourcemap: true,
    cssCodeSplit: false,
    chunkSizeWarningLimit: 2000,
    rollupOptions: {
      input: 'src/main.js',
      output: {
        entryFileNames: 'viewer.js',
        chunkFileNames: 'chunks/[name].js',
        assetFileNames: (asset) =>
          (asset.names || [asset.name]).some((n) => n && n.endsWith('.css'))
            ? 'viewer.css'
            : 'assets/[name][extname]',
      },
    },
  },
});
