{{/*
Names. Every object is "<fullname>-<component>"; fullname is the release name, prefixed with
the chart name unless the release name already contains it (63-character DNS limit).
*/}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<fullname>-<component>". Call with (dict "root" $ "component" "decode"). */}}
{{- define "tandem.componentName" -}}
{{- printf "%s-%s" (include "tandem.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The release's pods, whatever their component (NetworkPolicy peers). */}}
{{- define "tandem.releaseLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels of one component's objects. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" .root }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The model directory inside the pods. */}}
{{- define "tandem.modelDir" -}}
{{- if .Values.model.path }}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- print "/models" }}
{{- end }}
{{- end }}

{{/* The read-only model volume: a PVC or a hostPath, exactly one. */}}
{{- define "tandem.modelVolume" -}}
{{- $pvc := .Values.model.pvc.claimName }}
{{- $host := .Values.model.hostPath.path }}
{{- if and $pvc $host }}
{{- fail "model.pvc.claimName and model.hostPath.path are both set: set one (e.g. --set model.pvc.claimName=)" }}
{{- end -}}
- name: model
{{- if $pvc }}
  persistentVolumeClaim:
    claimName: {{ $pvc }}
    readOnly: true
{{- else if $host }}
  hostPath:
    path: {{ $host }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
{{- fail "set model.pvc.claimName or model.hostPath.path: the pods read the model from it" }}
{{- end }}
{{- end }}

{{- define "tandem.modelMount" -}}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}

{{/*
Writable scratch for a read-only root filesystem: HOME, Triton's kernel cache and torch's
temporary files live on an emptyDir at /tmp.
*/}}
{{- define "tandem.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: TANDEM_CACHE_DIR
  value: /tmp/tandem
{{- end }}

{{/*
Pod-level settings shared by every Tandem pod. Call with (dict "root" $ "pool" .Values.gateway).
*/}}
{{- define "tandem.podCommon" -}}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "tandem.scheduling" .pool }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of one pool's values. */}}
{{- define "tandem.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* True ("true") when the autoscaler or KEDA owns the worker Deployments' replica counts. */}}
{{- define "tandem.poolsAutoscaled" -}}
{{- if or .Values.keda.enabled .Values.autoscaler.enabled }}true{{ end }}
{{- end }}

{{/* The built-in autoscaler runs unless KEDA replaces it. */}}
{{- define "tandem.autoscalerEnabled" -}}
{{- if and .Values.autoscaler.enabled (not .Values.keda.enabled) }}true{{ end }}
{{- end }}

{{/*
A worker pool's resources with `gpus` nvidia.com/gpu in its limits (omitted when gpus is 0).
Call with the pool's values (.Values.prefill or .Values.decode).
*/}}
{{- define "tandem.workerResources" -}}
{{- $resources := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $resources.limits) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Cross-field checks JSON Schema cannot express. Included once, by workers.yaml. */}}
{{- define "tandem.checkValues" -}}
{{- range $role := list "prefill" "decode" }}
{{- $bounds := index $.Values.autoscaler $role }}
{{- if gt (int $bounds.minReplicas) (int $bounds.maxReplicas) }}
{{- fail (printf "autoscaler.%s.minReplicas (%v) is greater than autoscaler.%s.maxReplicas (%v)" $role $bounds.minReplicas $role $bounds.maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
